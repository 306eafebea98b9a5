#include "chain/link14.h"
#include "chain/link13.h"

int link_14(int x) { return link_13(x) + 14; }
