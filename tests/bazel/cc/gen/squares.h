#pragma once

extern const int squares[];
extern const int squares_count;
