#pragma once

// Step 5 of the chain: adds 5 to what step 4 computes.
int link_5(int x);
