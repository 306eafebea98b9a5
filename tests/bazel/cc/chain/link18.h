#pragma once

// Step 18 of the chain: adds 18 to what step 17 computes.
int link_18(int x);
