#include "chain/link04.h"
#include "chain/link03.h"

int link_4(int x) { return link_3(x) + 4; }
