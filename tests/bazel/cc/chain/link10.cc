#include "chain/link10.h"
#include "chain/link09.h"

int link_10(int x) { return link_9(x) + 10; }
