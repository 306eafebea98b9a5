#pragma once

// Step 12 of the chain: adds 12 to what step 11 computes.
int link_12(int x);
