#include "chain/link16.h"
#include "chain/link15.h"

int link_16(int x) { return link_15(x) + 16; }
