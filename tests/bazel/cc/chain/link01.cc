#include "chain/link01.h"

int link_1(int x) { return x + 1; }
