#pragma once

// Step 19 of the chain: adds 19 to what step 18 computes.
int link_19(int x);
