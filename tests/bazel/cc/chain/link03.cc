#include "chain/link03.h"
#include "chain/link02.h"

int link_3(int x) { return link_2(x) + 3; }
