#include "chain/link13.h"
#include "chain/link12.h"

int link_13(int x) { return link_12(x) + 13; }
