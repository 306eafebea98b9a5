#pragma once

// Step 10 of the chain: adds 10 to what step 9 computes.
int link_10(int x);
