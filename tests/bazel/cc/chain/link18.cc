#include "chain/link18.h"
#include "chain/link17.h"

int link_18(int x) { return link_17(x) + 18; }
