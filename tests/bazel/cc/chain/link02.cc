#include "chain/link02.h"
#include "chain/link01.h"

int link_2(int x) { return link_1(x) + 2; }
