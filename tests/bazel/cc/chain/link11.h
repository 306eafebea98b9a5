#pragma once

// Step 11 of the chain: adds 11 to what step 10 computes.
int link_11(int x);
