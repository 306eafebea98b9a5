#pragma once

// Step 3 of the chain: adds 3 to what step 2 computes.
int link_3(int x);
