#pragma once

// Step 1 of the chain: adds 1 to what step 0 computes.
int link_1(int x);
