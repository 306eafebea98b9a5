#pragma once

// Step 13 of the chain: adds 13 to what step 12 computes.
int link_13(int x);
