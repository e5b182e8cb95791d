// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {TimelockController} from "@openzeppelin/contracts/governance/TimelockController.sol";

/// @title VCoinTimelock
/// @notice OpenZeppelin's TimelockController, unchanged; it executes what VCoinGovernor passes
/// and should hold the admin roles of the other contracts.
contract VCoinTimelock is TimelockController {
    constructor(uint256 minDelay, address[] memory proposers, address[] memory executors, address admin)
        TimelockController(minDelay, proposers, executors, admin)
    {}
}
