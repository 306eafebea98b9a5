#include "chain/link06.h"
#include "chain/link05.h"

int link_6(int x) { return link_5(x) + 6; }
