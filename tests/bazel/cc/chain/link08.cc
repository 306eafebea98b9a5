#include "chain/link08.h"
#include "chain/link07.h"

int link_8(int x) { return link_7(x) + 8; }
