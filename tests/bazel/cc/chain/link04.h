#pragma once

// Step 4 of the chain: adds 4 to what step 3 computes.
int link_4(int x);
