#include "chain/link11.h"
#include "chain/link10.h"

int link_11(int x) { return link_10(x) + 11; }
