#include "CUffd.h"
