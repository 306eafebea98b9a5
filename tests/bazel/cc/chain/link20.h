#pragma once

// Step 20 of the chain: adds 20 to what step 19 computes.
int link_20(int x);
