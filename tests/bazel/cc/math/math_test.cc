#include <cstdio>

#include "math/pow.h"

int main() {
  if (power(2, 10) != 1024 || power(3, 4) != 81 || power(7, 0) != 1) {
    std::printf("power is wrong\n");
    return 1;
  }
  std::printf("math ok\n");
  return 0;
}
