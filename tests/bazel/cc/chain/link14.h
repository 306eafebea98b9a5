#pragma once

// Step 14 of the chain: adds 14 to what step 13 computes.
int link_14(int x);
