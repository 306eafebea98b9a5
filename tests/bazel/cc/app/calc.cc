#include <cstdio>

#include "chain/link20.h"
#include "gen/squares.h"
#include "gen/version.h"
#include "math/pow.h"

int main() {
  std::printf("version %s\n", PADDOCK_EXAMPLE_VERSION);
  std::printf("power %ld\n", power(2, 16));
  std::printf("chain %d\n", link_20(0));
  std::printf("square %d\n", squares[12]);
  return 0;
}
