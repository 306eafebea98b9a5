#include "chain/link17.h"
#include "chain/link16.h"

int link_17(int x) { return link_16(x) + 17; }
