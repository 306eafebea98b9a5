#pragma once

// Step 16 of the chain: adds 16 to what step 15 computes.
int link_16(int x);
