#include <cstdio>

#include "chain/link20.h"

int main() {
  // 1 + 2 + ... + 20 = 210.
  int got = link_20(0);
  if (got != 210) {
    std::printf("link_20(0) = %d, want 210\n", got);
    return 1;
  }
  std::printf("chain ok\n");
  return 0;
}
