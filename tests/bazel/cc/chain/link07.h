#pragma once

// Step 7 of the chain: adds 7 to what step 6 computes.
int link_7(int x);
