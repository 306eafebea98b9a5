#include "text/banner.h"

#include "text/join.h"
#include "text/upper.h"

std::string banner(const std::vector<std::string>& words) {
  return "== " + upper(join(words, " ")) + " ==";
}
