#include "chain/link12.h"
#include "chain/link11.h"

int link_12(int x) { return link_11(x) + 12; }
