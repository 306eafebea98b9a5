#pragma once

// Step 2 of the chain: adds 2 to what step 1 computes.
int link_2(int x);
