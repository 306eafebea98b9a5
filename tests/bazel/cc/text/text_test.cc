#include <cstdio>

#include "text/banner.h"

int main() {
  std::string got = banner({"remote", "build"});
  if (got != "== REMOTE BUILD ==") {
    std::printf("banner gave %s\n", got.c_str());
    return 1;
  }
  std::printf("text ok\n");
  return 0;
}
