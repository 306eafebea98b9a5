#include <cstdio>

#include "text/banner.h"

int main(int argc, char** argv) {
  std::vector<std::string> words(argv + 1, argv + argc);
  if (words.empty()) words = {"hello", "paddock"};
  std::printf("%s\n", banner(words).c_str());
  return 0;
}
