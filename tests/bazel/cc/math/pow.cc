#include "math/pow.h"

#include "math/mul.h"

long power(long base, int exponent) {
  long result = 1;
  for (int i = 0; i < exponent; ++i) result = mul(result, base);
  return result;
}
