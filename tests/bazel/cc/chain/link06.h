#pragma once

// Step 6 of the chain: adds 6 to what step 5 computes.
int link_6(int x);
