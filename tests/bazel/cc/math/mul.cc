#include "math/mul.h"

#include "math/add.h"

long mul(long a, long b) {
  long total = 0;
  for (long i = 0; i < b; ++i) total = add(total, a);
  return total;
}
