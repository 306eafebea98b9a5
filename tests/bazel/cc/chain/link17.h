#pragma once

// Step 17 of the chain: adds 17 to what step 16 computes.
int link_17(int x);
