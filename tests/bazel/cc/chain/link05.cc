#include "chain/link05.h"
#include "chain/link04.h"

int link_5(int x) { return link_4(x) + 5; }
