#include <cstdio>

#include "gen/squares.h"

int main() {
  if (squares_count != 32 || squares[5] != 25 || squares[31] != 961) {
    std::printf("squares table is wrong\n");
    return 1;
  }
  std::printf("squares ok\n");
  return 0;
}
