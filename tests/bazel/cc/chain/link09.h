#pragma once

// Step 9 of the chain: adds 9 to what step 8 computes.
int link_9(int x);
