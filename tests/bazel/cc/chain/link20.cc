#include "chain/link20.h"
#include "chain/link19.h"

int link_20(int x) { return link_19(x) + 20; }
