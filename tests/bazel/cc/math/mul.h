#pragma once

// Multiplication by repeated addition, to give the chain of libraries some depth.
long mul(long a, long b);
