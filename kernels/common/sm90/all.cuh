// The whole sm_90a primitive layer (namespace r1k::sm90): synchronization, copies, warpgroup MMA.
#pragma once
#include "common/sm90/copy.cuh"
#include "common/sm90/mma.cuh"
#include "common/sm90/sync.cuh"
