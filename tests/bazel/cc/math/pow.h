#pragma once

long power(long base, int exponent);
