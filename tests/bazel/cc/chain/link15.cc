#include "chain/link15.h"
#include "chain/link14.h"

int link_15(int x) { return link_14(x) + 15; }
