#include "chain/link07.h"
#include "chain/link06.h"

int link_7(int x) { return link_6(x) + 7; }
