// SPDX-License-Identifier: MIT
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {VCoin} from "./VCoin.sol";

/// @title Staking
/// @notice Nodes lock VCOIN to be eligible for tasks. Unstaking is two steps: `requestUnstake`
/// moves stake to a pending amount that `withdraw` releases after `unstakeDelay` seconds.
/// Pending stake no longer counts for eligibility but can still be slashed, so a node cannot
/// escape a slash by requesting an unstake first.
/// @dev Slashing (SLASHER_ROLE, granted to TaskAnchor) burns half of the slashed amount and
/// sends the other half to `reserve`; this contract needs VCoin's BURNER_ROLE.
contract Staking is AccessControl {
    using SafeERC20 for VCoin;

    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");

    struct Pending {
        uint256 amount;
        uint64 releaseTime;
    }

    VCoin public immutable token;
    address public reserve;
    uint64 public unstakeDelay;
    uint256 public minStake;
    uint256 public totalStaked;

    mapping(address => uint256) private _stakes;
    mapping(address => Pending) private _pending;

    event Staked(address indexed node, uint256 amount, uint256 newStake);
    event UnstakeRequested(address indexed node, uint256 amount, uint256 pendingAmount, uint64 releaseTime);
    event Withdrawn(address indexed node, uint256 amount);
    event Slashed(address indexed node, uint256 amount, uint256 burned, uint256 toReserve);
    event MinStakeSet(uint256 minStake);
    event UnstakeDelaySet(uint64 unstakeDelay);
    event ReserveSet(address reserve);

    error ZeroAmount();
    error ZeroAddress();
    error InsufficientStake(uint256 requested, uint256 available);
    error NothingToWithdraw();
    error UnstakeLocked(uint64 releaseTime);
    error NothingToSlash(address node);

    constructor(VCoin token_, address admin, address reserve_, uint64 unstakeDelay_, uint256 minStake_) {
        if (address(token_) == address(0) || admin == address(0) || reserve_ == address(0)) {
            revert ZeroAddress();
        }
        token = token_;
        reserve = reserve_;
        unstakeDelay = unstakeDelay_;
        minStake = minStake_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    // ---- nodes ----

    /// Locks `amount` VCOIN of the caller (needs an allowance for this contract).
    function stake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 newStake = _stakes[msg.sender] + amount;
        _stakes[msg.sender] = newStake;
        totalStaked += amount;
        token.safeTransferFrom(msg.sender, address(this), amount);
        emit Staked(msg.sender, amount, newStake);
    }

    /// Moves `amount` of active stake to pending; the whole pending amount is released
    /// `unstakeDelay` seconds after the latest request.
    function requestUnstake(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 active = _stakes[msg.sender];
        if (amount > active) revert InsufficientStake(amount, active);
        _stakes[msg.sender] = active - amount;
        totalStaked -= amount;
        Pending storage p = _pending[msg.sender];
        p.amount += amount;
        p.releaseTime = uint64(block.timestamp) + unstakeDelay;
        emit UnstakeRequested(msg.sender, amount, p.amount, p.releaseTime);
    }

    /// Pays out the caller's whole pending amount once its release time has come.
    function withdraw() external {
        Pending memory p = _pending[msg.sender];
        if (p.amount == 0) revert NothingToWithdraw();
        if (block.timestamp < p.releaseTime) revert UnstakeLocked(p.releaseTime);
        delete _pending[msg.sender];
        token.safeTransfer(msg.sender, p.amount);
        emit Withdrawn(msg.sender, p.amount);
    }

    // ---- views ----

    /// Active stake (what counts for eligibility).
    function stakeOf(address node) external view returns (uint256) {
        return _stakes[node];
    }

    function pendingOf(address node) external view returns (uint256 amount, uint64 releaseTime) {
        Pending memory p = _pending[node];
        return (p.amount, p.releaseTime);
    }

    /// Active plus pending stake: what a slash can reach.
    function slashableOf(address node) public view returns (uint256) {
        return _stakes[node] + _pending[node].amount;
    }

    /// True when the node has active stake of at least `minStake` (and more than zero).
    function isEligible(address node) external view returns (bool) {
        uint256 s = _stakes[node];
        return s > 0 && s >= minStake;
    }

    // ---- slashing ----

    /// Slashes up to `amount` of `node`'s stake, active first, then pending. Half (rounded
    /// down) is burned, the rest goes to `reserve`. Returns the amount slashed.
    function slash(address node, uint256 amount) external onlyRole(SLASHER_ROLE) returns (uint256 slashed) {
        if (amount == 0) revert ZeroAmount();
        uint256 active = _stakes[node];
        uint256 pending = _pending[node].amount;
        if (active + pending == 0) revert NothingToSlash(node);
        uint256 fromActive = amount < active ? amount : active;
        uint256 rest = amount - fromActive;
        uint256 fromPending = rest < pending ? rest : pending;
        _stakes[node] = active - fromActive;
        totalStaked -= fromActive;
        if (fromPending > 0) _pending[node].amount = pending - fromPending;
        slashed = fromActive + fromPending;
        uint256 burned = slashed / 2;
        uint256 toReserve = slashed - burned;
        if (burned > 0) token.burn(burned);
        if (toReserve > 0) token.safeTransfer(reserve, toReserve);
        emit Slashed(node, slashed, burned, toReserve);
    }

    // ---- admin ----

    function setMinStake(uint256 minStake_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        minStake = minStake_;
        emit MinStakeSet(minStake_);
    }

    /// Applies to later unstake requests, not to pending ones.
    function setUnstakeDelay(uint64 unstakeDelay_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        unstakeDelay = unstakeDelay_;
        emit UnstakeDelaySet(unstakeDelay_);
    }

    function setReserve(address reserve_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (reserve_ == address(0)) revert ZeroAddress();
        reserve = reserve_;
        emit ReserveSet(reserve_);
    }
}
