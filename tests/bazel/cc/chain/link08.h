#pragma once

// Step 8 of the chain: adds 8 to what step 7 computes.
int link_8(int x);
