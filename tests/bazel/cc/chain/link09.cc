#include "chain/link09.h"
#include "chain/link08.h"

int link_9(int x) { return link_8(x) + 9; }
