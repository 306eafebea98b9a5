#pragma once

// Step 15 of the chain: adds 15 to what step 14 computes.
int link_15(int x);
