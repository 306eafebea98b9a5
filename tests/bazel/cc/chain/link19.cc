#include "chain/link19.h"
#include "chain/link18.h"

int link_19(int x) { return link_18(x) + 19; }
